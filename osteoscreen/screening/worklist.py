"""From the results table to what a fracture liaison service acts on: the patients (not the images) whose
highest probability is at or over the model's threshold, ranked by it, with their flagged studies.

    summary.json   counts by status and by reason
    referrals.csv  one line per patient: rank, patient, highest probability, study date of that image, images
                   screened, flagged studies (study UID and date)
    report.html    the counts, the probability histogram (matplotlib) and the ranked table, with the thumbnail
                   of each flagged study's top image and its explanation overlay (`thumbnails`, made
                   beforehand under DIR/thumbnails/ and linked relatively: the page needs nothing online)

A file without a patient ID (a PNG from a folder) is its own entry, named by its source.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa

from osteoscreen.screening.schema import EXCLUDED, FAILED, SCREENED
from osteoscreen.screening.thumbnails import relative_path

REFERRAL_COLUMNS = ("rank", "patient_id", "max_probability", "threshold", "study_date", "images", "flagged_studies")


def summary(results: pa.Table) -> dict:
    frame = results.select(["status", "reason"]).to_pandas()
    by_status = {s: int((frame["status"] == s).sum()) for s in (SCREENED, EXCLUDED, FAILED)}
    excluded = frame.loc[frame["status"] == EXCLUDED, "reason"].value_counts()
    failed = frame.loc[frame["status"] == FAILED, "reason"].value_counts()
    return {"total": len(frame), "by_status": by_status,
            "excluded_by_reason": {str(k): int(v) for k, v in excluded.items()},
            "failed_by_reason": {str(k): int(v) for k, v in failed.items()}}


def flagged_images(results: pa.Table) -> pd.DataFrame:
    """The top image (highest probability) of each flagged study: a study with an image at or over the
    threshold, whose patient is therefore referred. Columns patient, study, study_date, id, source, probability;
    highest first."""
    frame = results.select(["id", "source", "patient_id", "study_instance_uid", "study_date", "status",
                            "probability", "threshold"]).to_pandas(date_as_object=True)
    flagged = frame[(frame["status"] == SCREENED) & (frame["probability"] >= frame["threshold"])].copy()
    flagged["patient"] = flagged["patient_id"].where(flagged["patient_id"].notna(), flagged["source"])
    flagged["study"] = flagged["study_instance_uid"].where(flagged["study_instance_uid"].notna(), flagged["source"])
    top = (flagged.sort_values(["probability", "id"], ascending=[False, True])
           .drop_duplicates(["patient", "study"]).reset_index(drop=True))
    return top[["patient", "study", "study_date", "id", "source", "probability"]]


def referrals(results: pa.Table) -> pd.DataFrame:
    """The ranked patients (REFERRAL_COLUMNS), highest probability first."""
    frame = results.to_pandas(date_as_object=True)
    screened = frame[frame["status"] == SCREENED].copy()
    if screened.empty:
        return pd.DataFrame(columns=list(REFERRAL_COLUMNS))
    screened["patient"] = screened["patient_id"].where(screened["patient_id"].notna(), screened["source"])
    screened["flagged"] = screened["probability"] >= screened["threshold"]
    rows = []
    for patient, images in screened.groupby("patient", sort=False):
        flagged = images[images["flagged"]]
        if flagged.empty:
            continue
        top = flagged.loc[flagged["probability"].idxmax()]
        studies = (flagged.assign(study=flagged["study_instance_uid"].fillna(flagged["source"]))
                   .sort_values("probability", ascending=False).drop_duplicates("study"))
        rows.append({"patient_id": patient, "max_probability": round(float(top["probability"]), 4),
                     "threshold": float(top["threshold"]),
                     "study_date": top["study_date"].isoformat() if top["study_date"] is not None else "",
                     "images": len(images),
                     "flagged_studies": ";".join(f"{s} ({d.isoformat() if d is not None else 'no date'})"
                                                 for s, d in zip(studies["study"], studies["study_date"]))})
    table = pd.DataFrame(rows, columns=[c for c in REFERRAL_COLUMNS if c != "rank"])
    table = table.sort_values(["max_probability", "patient_id"], ascending=[False, True]).reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def write(results: pa.Table, out: Path) -> dict:
    """summary.json, referrals.csv and report.html into `out`; returns the summary."""
    counts = summary(results)
    (out / "summary.json").write_text(json.dumps(counts, indent=2) + "\n")
    ranked = referrals(results)
    ranked.to_csv(out / "referrals.csv", index=False)
    (out / "report.html").write_text(report(counts, ranked, results, out))
    return counts


def histogram_png(results: pa.Table) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = results.select(["status", "probability", "threshold"]).to_pandas()
    screened = frame[frame["status"] == SCREENED]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.hist(screened["probability"], bins=20, range=(0, 1), color="#4a7ab5")
    if len(screened):
        ax.axvline(float(screened["threshold"].iloc[0]), color="#c0392b", linestyle="--", label="threshold")
        ax.legend()
    ax.set_xlabel("probability of osteoporosis")
    ax.set_ylabel("images")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def thumbnail_cells(results: pa.Table, out: Path) -> dict[str, str]:
    """Per referred patient, the HTML of its flagged studies' thumbnails (those made; a study whose thumbnail
    could not be made says so)."""
    e = html.escape
    cells: dict[str, list[str]] = {}
    for row in flagged_images(results).itertuples():
        day = row.study_date.isoformat() if row.study_date is not None else "no date"
        caption = f"{e(str(row.study))} ({day}), p = {row.probability:.3f}"
        path = relative_path(row.id)
        image = (f'<img class="thumbnail" src="{e(path)}" alt="explanation overlay of study {e(str(row.study))}">'
                 if (out / path).exists() else '<span class="no-thumbnail">no thumbnail</span>')
        cells.setdefault(row.patient, []).append(f"<figure>{image}<figcaption>{caption}</figcaption></figure>")
    return {patient: "".join(figures) for patient, figures in cells.items()}


def report(counts: dict, ranked: pd.DataFrame, results: pa.Table, out: Path) -> str:
    """One HTML page, readable offline: the histogram inline, the thumbnails beside it in DIR/thumbnails/ (linked
    relatively; nothing online). It holds patient identifiers and images, like DIR."""
    e = html.escape
    reasons = "".join(f"<li>excluded, {e(k)}: {v}</li>" for k, v in counts["excluded_by_reason"].items())
    reasons += "".join(f"<li>failed, {e(k)}: {v}</li>" for k, v in counts["failed_by_reason"].items())
    # the thumbnails before the long study UIDs, so that a screen's width shows them
    head = "".join(f"<th>{e(c)}</th>" for c in REFERRAL_COLUMNS[:-1]) + "<th>flagged studies' top images</th>"
    head += f"<th>{e(REFERRAL_COLUMNS[-1])}</th>"
    thumbs = thumbnail_cells(results, out)
    body = "".join("<tr>" + "".join(f"<td>{e(str(row[c]))}</td>" for c in REFERRAL_COLUMNS[:-1])
                   + f'<td class="thumbnails">{thumbs.get(row["patient_id"], "")}</td>'
                   + f'<td class="studies">{e(str(row[REFERRAL_COLUMNS[-1]]))}</td></tr>'
                   for _, row in ranked.iterrows())
    chart = base64.b64encode(histogram_png(results)).decode()
    s = counts["by_status"]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>OsteoScreen referral list</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #999;padding:4px 8px}}th{{background:#eee}}
figure{{display:inline-block;margin:4px;font-size:smaller;max-width:256px;word-break:break-all}}
td.studies{{word-break:break-all;max-width:24em}}img.thumbnail{{max-width:256px;max-height:256px}}</style></head>
<body><h1>DXA referral list</h1>
<p>Patients whose highest probability is at or over the model's threshold, ranked. Contains patient identifiers.
Each flagged study shows its top image with the explanation overlay: red pushes towards osteoporosis, blue away from
it; colours are scaled per image (where the evidence lies, not how strong it is).</p>
<ul id="counts"><li>screened: {s[SCREENED]}</li><li>excluded: {s[EXCLUDED]}</li><li>failed: {s[FAILED]}</li>{reasons}</ul>
<img id="histogram" alt="probability histogram" src="data:image/png;base64,{chart}">
<table id="referrals"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
</body></html>
"""
