"""``python -m qqq``: the ``qqq`` command line."""

from qqq.cli import main

main()
