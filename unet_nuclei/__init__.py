"""The machinery around the U-Net of ``unet_model_core``, one module per job:

    training   run folders, callbacks, devices, and ``train`` = ``open_run`` + ``fit`` + ``finalize``
    stages     a run's stages: native scale first, then every image at one nucleus size
    finetune   a run that starts from a trained model's weights (Train.py --init)
    pretrained the models shipped in models/, and which model a command uses
    checkpoints  what a run saves at every good epoch's end; the NaN guard
    cache      decoded datasets kept on disk across runs
    devices    distribution strategy, precision policy, CPU kernels
    files      every output written whole or not at all
    multiworker  training on several machines (TF_CONFIG): the loop model.fit cannot run there
    tiling     overlap-tile prediction at full resolution (NumPy plus a predict callable)
    instances  probability -> labelled nuclei, the DSB-2018 score, Dice/IoU, run-length rows, outlines
    label_images  label-image steps lean enough for very large images (sizes, relabelling, banded watershed)
    predict    prediction on files: load a run, predict one input, write its outputs and scores
    evaluation the fixed held-out split by image kind, and scores per kind and nucleus size
    measure    per-nucleus and per-image measurements, label TIFFs
    outlines   nucleus polygons for Fiji (ImageJ ROI sets) and QuPath (GeoJSON)
    export     the model as ONNX and as a BioImage Model Zoo package (``zoo`` writes the package)
    image_files  microscope files for prediction: the planes to segment (or their projection), the
               channel, the pixel size from the file's metadata
    plots      every figure, drawn on ``matplotlib.figure.Figure`` (no pyplot state)
    synthetic  the built-in synthetic nuclei sample in the DSB-2018 layout
    synthetic_render  the sample's renderers per kind of microscopy, with randomised nuisances

Imports run one way: these modules import ``unet_model_core``, never the reverse.  Importing the
package does no work; import the module you need (``from unet_nuclei import training``).
"""
