"""``hafloc export-onnx``: a model file -> an ONNX graph for ONNX Runtime (or any ONNX engine)."""

from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "export-onnx",
        help="export a model to ONNX (dynamic batch, height and width)",
        description="Writes the model as an ONNX graph (opset 17+). Input 'image': float32 "
        "(batch, 3, height, width), RGB in [0, 1], height and width multiples of 32. "
        "Outputs: 'descriptor' (batch, D) and, for methods with attention, "
        "'attention_low' / 'attention_mid' / 'attention_high' (batch, h, w). "
        "'hafloc extract' does this by itself (--backend auto/onnx) and caches the "
        "file next to the model; use this command to run the model elsewhere. The file's "
        "metadata_props record the preprocessing (size rule, max side, colour order, "
        "range, normalisation), the output names and the model fingerprint.",
    )
    p.add_argument("--model", required=True, help="model file (from 'hafloc model init' or 'hafloc train')")
    p.add_argument("--output", required=True, help="ONNX file to write (e.g. haf.onnx)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (17 or newer; default 17)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..descriptors.modelfile import load_model
    from ..errors import HaflocError

    try:
        from ..descriptors.onnx_backend import export_onnx, output_names
    except ImportError as err:
        raise HaflocError(f"ONNX export needs the onnx and onnxruntime packages ({err})") from None
    out = Path(args.output)
    if out.suffix != ".onnx":
        raise HaflocError(f"{out}: --output must end in .onnx")
    model = load_model(args.model)
    export_onnx(model, out, opset=args.opset)
    print(
        f"wrote {out}: {model.config.method}, input 'image' (batch, 3, height, width), "
        f"outputs {', '.join(output_names(model))}; descriptor {model.out_dim}-D, opset {args.opset}; "
        f"'hafloc model info {out}' shows how to feed it (size rule, colour order, normalisation)"
    )
    return 0
