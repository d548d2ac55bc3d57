"""The ``shoal`` command and its client SDK (the shoal-cli distribution).

- :mod:`shoal_cli.client`: :class:`~shoal_cli.client.ShoalClient`, the SDK: submit tasks
  and runs over NATS, wait for results, list and replay dead letters, watch runs.
- :mod:`shoal_cli.cli`: the ``shoal`` command (``shoal = shoal_cli.cli:main``), its
  commands in :mod:`shoal_cli.commands`, one module per noun.
- :mod:`shoal_cli.run_view`: how runs look in a terminal and in logs (pure functions).
- :mod:`shoal_cli.approvals` and :mod:`shoal_cli.kubeapi`: ``shoal approve``/``reject``
  write Approvals through the Kubernetes API.
- :mod:`shoal_cli.simulate_plot`: the PNG of ``shoal simulate --out`` (matplotlib, the
  ``[simulate]`` extra).

It never imports the runtime or the operator (import-linter checks).
"""
