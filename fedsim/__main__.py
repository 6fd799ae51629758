"""`python -m fedsim`: the same command line as `fedsim`."""

from fedsim.app.cli import main

main()
