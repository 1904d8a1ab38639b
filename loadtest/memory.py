"""Per-request memory of the front: what one image costs while it is decoded, measured, not guessed.

Each case runs in a fresh process (peak RSS, `ru_maxrss`, cannot be reset): it decodes a small warm-up
image, notes the peak, decodes the case, and reports the rise. The numbers size the front's limits
(OSTEOSCREEN_MAX_INFLIGHT_BYTES, the decode threads, the gRPC message and call limits) and the worst case
docs/deploy.md states. Usage: `python -m loadtest.memory` (JSON on stdout; a few seconds per case).
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile

CASES = ("png_phantom", "dicom_cr_uncompressed", "dicom_cr_jpeg2000", "png16_at_pixel_limit")

def case_bytes(name: str) -> bytes:
    """The encoded file of a case."""
    import numpy as np
    from PIL import Image

    from osteoscreen.imaging.decode import MAX_PIXELS

    if name == "png_phantom":
        from training.phantom import _encode_png, render_sample

        sample = render_sample(-2.0, seed=1)
        return _encode_png(sample.image, sample.sixteen_bit)
    if name.startswith("dicom_cr"):
        from pydicom.data import get_testdata_file

        stem = "RG1_UNCR" if name.endswith("uncompressed") else "RG1_J2KR"
        return open(get_testdata_file(f"{stem}.dcm"), "rb").read()
    side = int(MAX_PIXELS ** 0.5)  # the largest image the limits admit, smooth so that its PNG is small
    row = np.arange(side, dtype=np.uint32)
    ramp = ((row[:, None] + row[None, :]) * (65535 // (2 * side))).astype(np.uint16)
    out = io.BytesIO()
    Image.fromarray(ramp).save(out, format="PNG")
    return out.getvalue()


# The child: warm up on a small image (imports, allocator), note the peak RSS, decode the case, note it again.
_CHILD = """
import io, json, resource, sys
import numpy as np
from PIL import Image
from osteoscreen.imaging.decode import load_image
data = open(sys.argv[1], "rb").read()
warm = io.BytesIO()
Image.fromarray(np.add.outer(np.arange(256), np.arange(256)).astype(np.uint8)).save(warm, format="PNG")
load_image(warm.getvalue())
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
load_image(data)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"decode_peak_mib": round((after - before) / 1024, 1)}))
"""


def _run(code: str, *args: str) -> str:
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(result.stderr[-2000:])
    return result.stdout


def measure(case: str) -> dict:
    # The file is made in a process of its own: Linux carries a parent's peak RSS into its children
    # (ru_maxrss survives fork and exec), so this process must stay small for the measuring child.
    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/{case}.img"
        _run("import sys; from loadtest.memory import case_bytes; open(sys.argv[2], 'wb').write(case_bytes(sys.argv[1]))",
             case, path)
        with open(path, "rb") as fh:
            encoded = len(fh.read())
        peak = json.loads(_run(_CHILD, path).strip().splitlines()[-1])
    return {"case": case, "encoded_mib": round(encoded / 2**20, 2), **peak}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", choices=[*CASES, []], default=[])
    args = parser.parse_args(argv)
    print(json.dumps([measure(c) for c in args.cases or CASES], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
