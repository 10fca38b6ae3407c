"""The network alone: blocks, Encoder/Decoder, quantizers, the architecture config and the autoencoder wrapper."""
