"""autopipe: a graph compiler for pipeline-parallel training in PyTorch.

``compile`` traces a model, partitions it into stages and writes one standalone Python file per
partitioned model; ``verify`` proves the stages compute what the original model computes.
"""

from autopipe.compiler import CompileResult, compile
from autopipe.errors import UserError
from autopipe.verify import VerificationError, VerifyReport, verify

__all__ = ["CompileResult", "UserError", "VerificationError", "VerifyReport", "compile", "verify"]
