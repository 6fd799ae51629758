"""The top layer: the command line, run orchestration, the attack runner, the report and the demo."""
