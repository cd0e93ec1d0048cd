"""Bi-ZsRE (Wang et al., arXiv 2309.08952): bilingual zsRE knowledge editing, en and zh."""
