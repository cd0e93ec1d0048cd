"""What is made from lm-eval results files: leaderboards, submission bundles and their verification, side-effect
comparisons, and figures; ``results`` is the one reader they share."""
