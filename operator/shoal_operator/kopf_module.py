"""``kopf run -m shoal_operator.kopf_module``: the operator under kopf's own command line.

For the in-process test runner (kopf.testing.KopfRunner), where kopf parses the command
line (``--standalone``, ``--namespace``) and this module only registers handlers on
kopf's default registry. The configuration is read from the environment at each
start-up, so tests that change it between runs get what they set.
"""

from __future__ import annotations

import os

import kopf

from shoal_operator import config, watches
from shoal_operator.app import Operator

OPERATOR = Operator(lambda: config.from_env(os.environ))
"""The operator kopf runs from this module (tests look at its running parts)."""

watches.register(kopf.get_default_registry(), OPERATOR)
