#!/bin/sh
# User data for submit-examples/provision.sub: what an instance of a provision-mode annex runs
# at boot (as root, once). Start your own pilot here; this one only logs and idles until the
# annex's lease ends (the helper terminates the instance then). With annex_user_data_template
# = true the helper renders {{ ... }} first; each instance's own index is EC2's
# ami-launch-index, from the instance metadata service (IMDSv2).
IMDS=${ANNEX_IMDS_URL:-http://169.254.169.254}
token=$(curl -s -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 300" "$IMDS/latest/api/token")
index=$(curl -s -H "X-aws-ec2-metadata-token: $token" "$IMDS/latest/meta-data/ami-launch-index")
echo "pilot $index of {{ annex_instances }} for annex {{ annex_name }} started on $(hostname)" \
    "at $(date -u); the annex ends at {{ annex_expires_utc }}" >> /var/log/my-pilot.log
