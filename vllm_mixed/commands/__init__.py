"""The ``vllm-mixed`` commands, one module each: ``add_parser(subparsers)``
adds the command's parser (its ``func`` default is the module's ``run``) and
``run(args)`` runs it and returns the exit status. :mod:`vllm_mixed.cli`
assembles them. Commands depend on the library; no library module imports a
command, and no library function takes their parsed arguments.

Each module imports only argparse-level things at import time; the library
(torch, vLLM, compressed-tensors) is imported inside ``run``, so
``vllm-mixed --help`` stays fast and the CLI imports no vLLM."""
