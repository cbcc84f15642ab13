"""Run bookkeeping: staging and merging, markers, failures and metadata, progress, safe writes."""
