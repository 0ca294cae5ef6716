"""afloc: annotation-free pathology localization in chest radiographs (AFLoc)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("afloc")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+src"
