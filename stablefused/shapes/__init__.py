"""The bundled ``shapes`` model: a procedurally drawn dataset of coloured shapes, its training script, and
an analytic classifier that reads colour, shape, size and background back from an image.

    from stablefused.shapes import data, classify
    img, attrs, prompt = data.sample(seed=0)          # one dataset item
    classify.classify_image(img)                      # {"color": "red", "shape": "circle", ...}
    classify.parse_prompt("a small red circle")       # {"color": "red", "shape": "circle", "size": "small"}

Training (reproduces ``stablefused/models/shapes``): ``python -m stablefused.shapes.train``.
"""
