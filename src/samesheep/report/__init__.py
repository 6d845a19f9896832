"""The report: a static site of the run, from the files the other stages wrote."""

from .build import report_stage

__all__ = ["report_stage"]
