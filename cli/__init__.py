"""The `clipcoco` command-line tool: thin typer wrappers over the library functions."""

# The --device rule of every command (pipeline/runtime.py applies it); kept here so `--help` imports no torch.
DEVICE_HELP = ("auto (a GPU when one is visible, else the CPU), cpu, cuda (this process's GPU: the one of its "
               "LOCAL_RANK under torchrun) or cuda:N.")
