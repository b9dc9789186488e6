"""htcondor-annex-gahp: cloud capacity for HTCondor as a side effect of job submission."""

# Kept import-free on purpose: the job router hooks import this package and must start fast.
__version__ = "0.1.0"
