"""What the `pytest11` entry point `htcondor_annex` loads: the plugin by its module name.

Through `pytest_plugins`, so that `pytest -p annex_gahp.testing` in an environment that also has
the entry point loads the plugin once (pytest skips a module name it already registered, where
registering the same module under the entry point's name would fail)."""

pytest_plugins = ["annex_gahp.testing"]
