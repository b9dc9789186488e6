#!/bin/sh
# User data for submit-examples/provision.sub: what an instance of a provision-mode annex runs
# at boot (as root, once). Start your own pilot here; this one only logs and idles until the
# annex's lease powers the instance off.
echo "pilot started on $(hostname) at $(date -u)" >> /var/log/my-pilot.log
