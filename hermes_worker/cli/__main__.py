"""``python -m hermes_worker.cli``: the same as the ``hermes-worker`` command."""

from hermes_worker.cli.commands import main

if __name__ == "__main__":
    main()
