"""What each command does after the command line has parsed it: one module per command (distill,
sample, evaluate, export, teacher, bench, demo). Functions take keyword arguments; they name recipe
fields and files in their errors, never flags (flags live only in emdctl.cli)."""
