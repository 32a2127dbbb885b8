"""The machinery around the U-Net of ``unet_model_core``, one module per job:

    segmenter  an image to its nuclei, one way for every caller: preprocessing, the tiled forward passes,
               the nucleus-scale second pass, TTA, post-processing (``Segmenter``, ``Prediction``)
    tiling     overlap-tile forward passes at full resolution (NumPy plus a predict callable); imports
               nothing of this package
    postprocess  model output -> labelled nuclei (``PostProcessing``), and its choice on validation images
    metrics    matching against ground truth: the DSB-2018 score, Dice/IoU
    label_images  label-image steps lean enough for very large images (sizes, relabelling, banded watershed)
    formats    label images (16-bit PNG, TIFF with pixel size) and DSB-2018 run-length rows
    outlines   nucleus polygons for Fiji (ImageJ ROI sets) and QuPath (GeoJSON)
    plots      every figure, drawn on ``matplotlib.figure.Figure`` (no pyplot state), and outline overlays
    predict    prediction on files: collect the inputs, segment one and write its outputs, the scores table
    image_files  microscope files for prediction: the planes to segment (or their projection), the
               channel, the pixel size from the file's metadata
    measure    per-nucleus and per-image measurements
    runs       run folders: create, find, read and write what a run records
    pretrained the models shipped in models/, and which model a command uses
    training   ``train`` = ``open_run`` + ``fit`` + ``finalize``: data, pipelines, callbacks, resume
    stages     a run's stages: native scale first, then every image at one nucleus size
    finetune   a run that starts from a trained model's weights (Train.py --init)
    checkpoints  what a run saves at every good epoch's end; the NaN guard
    cache      decoded datasets kept on disk across runs
    devices    distribution strategy, precision policy, CPU kernels
    files      every output written whole or not at all
    logs       the package's messages go to ``logging``; the scripts and the notebook show them on the console
    multiworker  training on several machines (TF_CONFIG): the loop model.fit cannot run there
    evaluation the fixed held-out split by image kind, and scores per kind and nucleus size
    export     the model as ONNX and as a BioImage Model Zoo package (``zoo`` writes the package)
    synthetic  the built-in synthetic nuclei sample in the DSB-2018 layout
    synthetic_render  the sample's renderers per kind of microscopy, with randomised nuisances

Prediction (``segmenter``, ``predict``) never imports ``training``.
Imports run one way: these modules import ``unet_model_core``, never the reverse.  Importing the
package does no work; import the module you need (``from unet_nuclei import training``).
"""
