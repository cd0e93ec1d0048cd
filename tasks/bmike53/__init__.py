"""BMIKE-53 (Nie et al., arXiv 2406.17764): zsRE, CounterFact and WikiFactDiff in 53 languages."""
