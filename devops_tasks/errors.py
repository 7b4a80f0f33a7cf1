"""One exception family: every message says what failed and what to do next."""


class DevopsError(Exception):
    """Base of every error this package raises on purpose (the CLI prints it, no traceback)."""


class ConfigError(DevopsError):
    """A config file (``~/.core/config.yaml``, ``.core/test.yaml``, a recipe) is unreadable or wrong."""


class ManifestError(DevopsError):
    """The image manifest cannot be read or written."""


class ImageError(DevopsError):
    """Installing, updating or building an image failed."""


class SourceError(ImageError):
    """An image source could not answer or deliver."""


class ChecksumError(ImageError):
    """A downloaded image does not match its published sha256."""


class VMError(DevopsError):
    """Booting, stopping or inspecting a VM failed."""


class NotRunningError(VMError):
    """The VM a command needs is not running."""


class GuestError(DevopsError):
    """Talking to the guest over SSH (commands, mounts, forwards) failed."""


class ProjectError(DevopsError):
    """The project's test or serve command cannot be determined."""
