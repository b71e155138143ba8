"""Evaluation of a bundle on the shapes data: the canonical scene form captions and images share
(scenes), the attribute classifier that reads images (classifier, torch only), the evaluate job's
work (run) and what it draws (report)."""
