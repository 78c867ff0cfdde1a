from blt.cli import entry

entry()
