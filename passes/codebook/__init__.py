"""Weight sharing by k-means (Han et al., Deep Compression, ICLR 2016): the codebook passes."""
