"""imagebeam: image collections into training-ready datasets with Apache Beam."""
__version__ = "0.1.0"
