"""The daemon: the process and its mounts, the control socket, systemd, logging, locks."""
