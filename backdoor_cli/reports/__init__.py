"""Reports: what a run found, rendered as JSON, Markdown, terminal tables and pictures; the audit's record.

- report: the evaluate / purify / compare / train reports (schema: docs/report-schema.md); bar_chart: report.png
- scan_report: the scan's verdicts, JSON, trigger pictures and specs
- audit_log: the audit's JSONL rows, resume, merge and exit-code rule; audit_report: their summary

Nothing is re-exported here: audit_log is torch-free (the CLI reads it before anything heavy), so importing
it must not import the other modules.
"""
