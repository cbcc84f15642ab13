"""Runner plumbing shared by every job: pipeline options, the network options, imagebeam's DaskRunner."""
