"""The autopipe runtime: runs generated pipeline files on torch.distributed.

It needs a generated file and torch, nothing from the compiler.
"""
