"""MzsRE (Wang et al., ReMaKE, arXiv 2312.13040): zsRE in 12 languages, one parallel table."""
