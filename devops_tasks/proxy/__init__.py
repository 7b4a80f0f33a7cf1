"""The host proxy that is a restricted VM's one way out (see :mod:`.server`), its allowlist
(:mod:`.allowlist`, pure) and its log (:mod:`.log`). Knows neither QEMU nor SSH."""
