"""emseg's command-line interface (click). Installed as the subpackage ``emseg.cli``."""
