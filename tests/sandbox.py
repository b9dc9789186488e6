"""`import sandbox` in the project's tests: the package's inside-the-sandbox helpers
(annex_gahp.testing.inside), kept under the name the tests have always used."""

from annex_gahp.testing.inside import *  # noqa: F403
