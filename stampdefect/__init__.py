"""Unsupervised crack and defect detection for large stamped metal products, taught and built in notebooks

Modules:

- `stampdefect.alignment`: Segment the product (Segment Anything or a classical threshold), fill its holes, and learn the affine map that puts every photo's panel where the template's is, exactly enough (< 2 px at 3840x2160) to compare patches.
- `stampdefect.backbones`: EfficientNet-Lite0 rebuilt in plain PyTorch around the ImageNet checkpoint that ships on PyPI, multi-scale feature taps named by stride, and the same interface for torchvision ResNets from a local weights file.
- `stampdefect.blocks.vqvae`: The discrete autoencoder of Zhang, Kong and Park, "Unsupervised Crack Detection in Large Stamped Metal Products via Spatial Transformer and U2-Net with Masked Attention and Patch Positional Encoding" (eq. 2): residual conv encoder/decoder, a 512 x 64 codebook learned by exponential moving averages with dead-code restarts, and an L2 + commitment + perceptual loss.
- `stampdefect.geometry`: Exact conversions between pixel affine matrices and the normalised `theta` of `F.affine_grid`, full-resolution warps of photos, heat maps and label masks, and the image helpers (any photo in, (C, H, W) float out) that the alignment and the pipeline rely on.
- `stampdefect.kernels`: The two hot paths of memory-bank detectors (PatchCore): exact nearest-neighbour search through BLAS plus a fused Numba reduction, and PatchCore's greedy coreset. One API for NumPy, PyTorch and CuPy arrays, CPU or GPU.
- `stampdefect.masks`: Segment the stamped product from the belt without weights (Otsu's threshold, morphology, the largest component, holes filled), keep the sub-pixel coverage of its edges, and give every mask, classical or from Segment Anything, the working size the alignment compares at.
- `stampdefect.models.mna`: The distribution model of Zhang, Kong and Park (*Unsupervised Crack Detection in Large Stamped Metal Products via Spatial Transformer and U2-Net with Masked Attention and Patch Positional Encoding*) over VQ-VAE codes: a U2-Net that never sees the code it predicts nor its neighbours, with patch positional encoding; cracks are the codes it finds unlikely, resampled and decoded. The VQ-VAE + autoregressive-prior baseline of the paper's table shares its machinery (chapter 12a).
- `stampdefect.models.patchcore`: A memory bank of normal patch features, thinned by a greedy coreset and searched by exact nearest neighbours: on the small shipped backbone, with a fit that streams, tiles for full-resolution panels, and banks per tile position.
- `stampdefect.pipeline`: align -> tile -> detect -> stitch -> map back to the photo -> report: one function from a raw panel photo to a decision, crack regions and an overlay, with alignment failures reported, never passed as good.
- `stampdefect.sam`: Load an official Segment Anything checkpoint (or any SAM built from the same classes) without unpickling anything, read its architecture from the weights, and get the product's mask from a box prompt or from the automatic mask generator.
- `stampdefect.stn`: A small localisation network regresses the affine `theta` that puts a product mask on the template, trained on jittered training masks by the paper's eq. (1); and the direct per-image optimisation of the same loss, which refines its answer.
- `stampdefect.training`: One helper trains every learned method: seeded, resumable from atomic checkpoints, mixed precision on the GPU, a progress bar and a loss history.
- `stampdefect.widgets`: A heatmap viewer (opacity, threshold, image) and a latent-space explorer for the VQ-VAE + MNA prior detector, fast enough to drag, tested without a browser, and still interactive on the static docs site."""

__version__ = "0.1.0"
