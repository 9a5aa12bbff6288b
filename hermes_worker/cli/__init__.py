"""The ``hermes-worker`` command line: the commands, the admin tables, the demo, the
benchmark launcher, and the local services the demo starts."""
