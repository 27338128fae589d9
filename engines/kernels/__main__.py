"""`python -m granite_deploy.engines.kernels`: build the CPU kernel library for this machine."""

import sys

from . import KernelBuildError, build, cpu_supported


def main() -> int:
    if not cpu_supported():
        print("granite-deploy kernels: this CPU lacks AVX2/FMA; ONNX Runtime's own kernels will run", file=sys.stderr)
        return 0
    try:
        path = build(force="--force" in sys.argv[1:])
    except (KernelBuildError, OSError) as exc:
        print(f"granite-deploy kernels: not built: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
