"""``python -m prunevid_bench`` (and ``torchrun -m prunevid_bench``): the `prunevid` command."""

from prunevid_bench.cli import main

main()
