"""How the synthetic sample's nuclei become pixels: random fields, and one renderer per kind of microscopy.

``synthetic.py`` places the nuclei (a label image, a nuclear-signal image and a coverage image); the
functions here turn them into an RGB image the way each kind of microscope would, with the nuisances a
model meets on real images randomised per image (domain randomisation): uneven illumination, blur and
defocus, shot and read noise, debris that is not a nucleus, cell bodies and busy tissue around the nuclei,
stain colours.  No real pixels are used: every texture is made from random numbers.  Importing this
module does no work.
"""

from __future__ import annotations

import cv2
import numpy as np


def smooth_field(rng, h, w, cells):
    """Low-frequency random field with zero mean and unit std (illumination, tissue)."""
    grid = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    field = cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    return (field - field.mean()) / (field.std() + 1e-6)


def texture(rng, h, w, sigma):
    """Blurred white noise with unit std: chromatin granularity and tissue grain."""
    noise = rng.standard_normal((h, w)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / (noise.std() + 1e-6)


def blobs(rng, h, w, size, fraction):
    """A soft mask (0-1) of random blobs about ``size`` px across that cover about ``fraction`` of the field:
    cell bodies, tissue structures and debris that are not nuclei."""
    field = texture(rng, h, w, max(1.0, size / 3))
    cut = np.percentile(field, 100 * (1 - fraction))
    return np.clip((field - cut) * 2.0, 0.0, 1.0)


def add_noise(rng, img, photons, read_sigma):
    """Shot noise (variance proportional to the signal) plus Gaussian read noise."""
    noisy = img + np.sqrt(np.maximum(img, 0.0) / photons) * rng.standard_normal(img.shape).astype(np.float32)
    return noisy + read_sigma * rng.standard_normal(img.shape).astype(np.float32)


def _optics(rng, img, sharp=(0.5, 1.1), defocus=(1.5, 3.5), p_defocus=0.2):
    """Blur by the microscope's point-spread function: mostly sharp, sometimes out of focus."""
    sigma = rng.uniform(*defocus) if rng.random() < p_defocus else rng.uniform(*sharp)
    return cv2.GaussianBlur(img.astype(np.float32), (0, 0), sigma)


def render_fluorescence(rng, signal, coverage, d_mean):
    """DAPI/Hoechst-like image: emitted light adds to a dark, unevenly lit background."""
    h, w = signal.shape
    background = rng.uniform(0.0, 0.06) * (1.0 + 0.3 * smooth_field(rng, h, w, 3))
    # Out-of-focus light from cell bodies or neighbouring planes: a faint haze around the nuclei.
    haze = rng.uniform(0.0, 0.08) * cv2.GaussianBlur(coverage, (0, 0), 0.6 * d_mean) if rng.random() < 0.4 else 0.0
    # Debris: small bright specks, so not every bright spot is a nucleus.  Dim nucleus-sized smudges were
    # tried and taught the model to drop dim real nuclei beside bright ones (generator v3).
    debris = 0.0
    if rng.random() < 0.5:
        debris = rng.uniform(0.2, 0.8) * blobs(rng, h, w, rng.uniform(1.5, 3.0), rng.uniform(0.0005, 0.003))
    illumination = np.clip(1.0 + rng.uniform(0.0, 0.45) * smooth_field(rng, h, w, 2), 0.3, None)
    img = (np.maximum(background, 0.0) + haze + debris + signal) * illumination
    img = _optics(rng, img)
    img = add_noise(rng, img, np.exp(rng.uniform(np.log(20), np.log(3000))), rng.uniform(0.002, 0.015))
    if rng.random() < 0.75:
        colour = np.ones(3, np.float32)  # Grey images stored as three equal channels.
    else:
        palette = [(0.3, 0.5, 1.0), (0.6, 0.35, 1.0), (0.25, 1.0, 0.35), (1.0, 0.3, 0.25), (0.0, 0.0, 1.0)]
        colour = np.array(palette[int(rng.integers(len(palette)))], np.float32)
    return img[..., None] * colour


def render_histology(rng, signal, coverage, d_mean):
    """Stained image: hematoxylin (nuclei) and eosin or a counterstain absorb white light.

    Two looks are randomised: dense tissue (H&E sections, the busy background a model must not take for
    nuclei) and stained cells on a white slide (each nucleus inside a paler cell body).
    """
    h, w = signal.shape
    tissue_look = rng.random() < 0.6
    # Cell bodies: a lumpy, paler region around each nucleus, stained by both dyes.
    body = cv2.GaussianBlur(coverage, (0, 0), rng.uniform(0.3, 0.8) * d_mean)
    body = np.clip(body / (body.max() + 1e-6) * rng.uniform(1.5, 4.0), 0.0, 1.0)
    body *= np.clip(1.0 + 0.5 * texture(rng, h, w, max(1.5, d_mean / 4)), 0.0, None)
    if tissue_look:
        # Tissue: grain at two scales, fibre-like streaks, a few empty (white) gaps.
        line = np.zeros((15, 15), np.float32)
        angle = rng.uniform(0, np.pi)
        cv2.line(
            line,
            (int(7 - 7 * np.cos(angle)), int(7 - 7 * np.sin(angle))),
            (int(7 + 7 * np.cos(angle)), int(7 + 7 * np.sin(angle))),
            1.0,
            1,
        )
        fibres = cv2.filter2D(rng.standard_normal((h, w)).astype(np.float32), -1, line / line.sum())
        fibres /= fibres.std() + 1e-6
        tissue = 0.6 + 0.15 * texture(rng, h, w, 4.0) + 0.08 * fibres + 0.08 * texture(rng, h, w, 1.0)
        gaps = smooth_field(rng, h, w, int(rng.integers(2, 6)))
        tissue *= np.clip((gaps + rng.uniform(0.6, 2.5)) * 2.0, 0.1, 1.0)
    else:
        tissue = 0.15 * np.clip(1.0 + 0.5 * texture(rng, h, w, 3.0), 0.0, None)
    # Structures the size of nuclei but paler (cytoplasm, collagen, out-of-plane nuclei): unlabelled.
    decoys = blobs(rng, h, w, d_mean * rng.uniform(0.5, 1.5), rng.uniform(0.0, 0.1))
    decoys *= np.clip(1.0 + 0.6 * texture(rng, h, w, 1.5), 0.0, None) * (1.0 - coverage)
    eosin = rng.uniform(0.08, 0.35) * np.clip(tissue, 0.05, None) + rng.uniform(0.05, 0.35) * body
    eosin *= 1.0 - 0.4 * coverage
    hema = (
        rng.uniform(0.02, 0.08) * np.clip(tissue, 0.0, None)
        + rng.uniform(0.0, 0.08) * body
        + rng.uniform(0.0, 0.12) * decoys
        + signal
    )
    # Beer-Lambert mixing of the two stains with jittered stain vectors (RGB optical density); a purple
    # counterstain instead of pink eosin stands in for the other stains of the data.
    h_vec = np.array([0.65, 0.70, 0.29]) + rng.normal(0, 0.07, 3)
    purple = rng.random() < 0.5
    e_vec = (np.array([0.30, 0.55, 0.12]) if purple else np.array([0.10, 0.85, 0.35])) + rng.normal(0, 0.05, 3)
    density = hema[..., None] * np.clip(h_vec, 0.02, None) + eosin[..., None] * np.clip(e_vec, 0.02, None)
    white = rng.uniform(0.85, 0.98) * (1.0 + rng.normal(0, 0.02, 3))
    img = (white * 10.0 ** (-np.clip(density, 0.0, None))).astype(np.float32)
    img *= np.clip(1.0 + rng.uniform(0.0, 0.12) * smooth_field(rng, h, w, 2), 0.5, None)[..., None]
    img = _optics(rng, img, sharp=(0.5, 1.2), defocus=(1.5, 2.5), p_defocus=0.15)
    return add_noise(rng, img, np.exp(rng.uniform(np.log(1000), np.log(10000))), rng.uniform(0.002, 0.01))


def render_brightfield(rng, signal, coverage, d_mean):
    """Unstained or lightly stained transmitted light: grey nuclei on light grey."""
    h, w = signal.shape
    level = rng.uniform(0.6, 0.9)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    vignette = 1.0 - rng.uniform(0.0, 0.3) * (((yy / h - 0.5) ** 2 + (xx / w - 0.5) ** 2) / 0.5)
    background = level * vignette * (1.0 + 0.05 * smooth_field(rng, h, w, 3) + 0.02 * texture(rng, h, w, 2.0))
    # Cell bodies absorb too, often several nucleus diameters across and with ragged edges: in the
    # model's grey view they are mid-grey shapes around each bright nucleus that must stay background.
    body = cv2.GaussianBlur(coverage, (0, 0), rng.uniform(0.5, 1.5) * d_mean)
    body = body / (body.max() + 1e-6) + 0.04 * texture(rng, h, w, max(2.0, d_mean / 2))
    body = np.clip((body - rng.uniform(0.15, 0.35)) * 8.0, 0.0, 1.0)
    body = cv2.GaussianBlur(body, (0, 0), 1.0)
    img = background * (1.0 - signal - rng.uniform(0.0, 0.3) * body * (1.0 - coverage))
    # A faint bright halo around nuclei, as produced by slight defocus in transmitted light.
    halo = np.clip(cv2.GaussianBlur(coverage, (0, 0), 2.0) - coverage, 0.0, None)
    img += rng.uniform(0.0, 0.4) * level * halo
    img = _optics(rng, img, sharp=(0.6, 1.5), defocus=(1.5, 2.5), p_defocus=0.15)
    img = add_noise(rng, img, 3000.0, rng.uniform(0.004, 0.012))
    tint = np.ones(3) if rng.random() < 0.6 else 1.0 + rng.normal(0, 0.05, 3)
    return img[..., None] * tint.astype(np.float32)


RENDERERS = {
    "fluorescence": render_fluorescence,
    "histology": render_histology,
    "brightfield": render_brightfield,
}
