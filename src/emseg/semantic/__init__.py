"""The U-Net class-map family: predict, evaluate, export (bioimage.io) and the demo."""
