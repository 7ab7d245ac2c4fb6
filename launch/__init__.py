"""The command line and runners: everything that starts plait from outside."""
