"""Files the builder puts into every guest (package data): the initramfs init, the root file
system's init scripts and services, and the host-independent mkfs settings."""
