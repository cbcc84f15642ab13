"""The reusable stages of every job, a folder per stage: inputs, imaging (image maths), formats, model,
bookkeeping (staging, markers, reports)."""
