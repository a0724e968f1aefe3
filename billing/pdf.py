"""An invoice as a PDF: a small writer of text and rules in the standard Helvetica fonts.

The standard fonts need no embedding, so a PDF 1.4 file of a few objects is all an invoice takes.
"""

from __future__ import annotations

import re

from factory_saas.templatetags.money import cents

from .invoicing import invoice_statement
from .models import Invoice

PAGE_WIDTH, PAGE_HEIGHT = 595, 842  # A4 in points
MARGIN = 56
TOP = PAGE_HEIGHT - MARGIN
BOTTOM = MARGIN + 40  # room for the footer
AMOUNT_RIGHT = PAGE_WIDTH - MARGIN
QUANTITY_RIGHT = 400
UNIT_LEFT = 410
LINE_HEIGHT = 16
DESCRIPTION_CHARS = 52

# Advance widths (1/1000 em) of ASCII 32-126 in Helvetica and Helvetica-Bold, from their AFM
# files, to set text flush right; other characters are taken at 556 (the digits' width).
_AFM_WIDTHS = {
    False: (
        "278 278 355 556 556 889 667 191 333 333 389 584 278 333 278 278 556 556 556 556 556 556 "
        "556 556 556 556 278 278 584 584 584 556 1015 667 667 722 722 667 611 778 722 278 500 667 "
        "556 833 722 778 667 778 722 667 611 722 667 944 667 667 611 278 278 278 469 556 333 556 "
        "556 500 556 556 278 556 556 222 222 500 222 833 556 556 556 556 333 500 278 556 500 722 "
        "500 500 500 334 260 334 584"
    ),
    True: (
        "278 333 474 556 556 889 722 238 333 333 389 584 278 333 278 278 556 556 556 556 556 556 "
        "556 556 556 556 333 333 584 584 584 611 975 722 722 722 722 667 611 778 722 278 556 722 "
        "611 833 722 778 667 778 722 667 611 722 667 944 667 667 611 333 278 333 584 556 333 556 "
        "611 556 611 556 333 611 611 278 278 556 278 889 611 611 611 611 389 556 333 611 556 778 "
        "556 556 500 389 280 389 584"
    ),
}
_WIDTHS = {
    bold: dict(zip(map(chr, range(32, 127)), map(int, w.split()), strict=True))
    for bold, w in _AFM_WIDTHS.items()
}


def _width(text: str, size: float, *, bold: bool = False) -> float:
    widths = _WIDTHS[bold]
    return sum(widths.get(char, 556) for char in text) * size / 1000


def _literal(text: str) -> bytes:
    """A PDF string in WinAnsiEncoding (characters it lacks become '?')."""
    raw = text.encode("cp1252", errors="replace")
    return b"(" + raw.replace(b"\\", b"\\\\").replace(b"(", b"\\(").replace(b")", b"\\)") + b")"


class _Document:
    def __init__(self):
        self.pages: list[list[bytes]] = []
        self.y = 0.0
        self.new_page()

    def new_page(self) -> None:
        self.pages.append([])
        self.y = TOP

    def ensure_room(self, height: float) -> None:
        if self.y - height < BOTTOM:
            self.new_page()

    def text(self, x: float, y: float, text: str, *, size=10.0, bold=False, right=False) -> None:
        if right:
            x -= _width(text, size, bold=bold)
        font = b"/F2" if bold else b"/F1"
        self.pages[-1].append(
            b"BT %s %.1f Tf %.2f %.2f Td %s Tj ET" % (font, size, x, y, _literal(text))
        )

    def rule(self, y: float, *, x1: float = MARGIN, x2: float = AMOUNT_RIGHT, width=0.5) -> None:
        self.pages[-1].append(b"%.2f w %.2f %.2f m %.2f %.2f l S" % (width, x1, y, x2, y))

    def render(self, *, title: str) -> bytes:
        objects: list[bytes] = [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"",  # the page tree, once the pages' numbers are known
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>",
            b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica-Bold "
            b"/Encoding /WinAnsiEncoding >>",
            b"<< /Title %s /Producer (factory_saas) >>" % _literal(title),
        ]
        kids = []
        for number, operations in enumerate(self.pages, start=1):
            footer = f"Page {number} of {len(self.pages)}"
            operations = [
                *operations,
                b"BT /F1 8.0 Tf %.2f %.2f Td %s Tj ET"
                % (AMOUNT_RIGHT - _width(footer, 8), MARGIN, _literal(footer)),
            ]
            content = b"\n".join(operations)
            objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
            kids.append(len(objects) + 1)
            objects.append(
                b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 %d %d] "
                b"/Resources << /Font << /F1 3 0 R /F2 4 0 R >> >> /Contents %d 0 R >>"
                % (PAGE_WIDTH, PAGE_HEIGHT, len(objects))
            )
        objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (
            b" ".join(b"%d 0 R" % kid for kid in kids),
            len(kids),
        )
        out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
        offsets = []
        for number, body in enumerate(objects, start=1):
            offsets.append(len(out))
            out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
        xref = len(out)
        out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
        out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
        out += b"trailer\n<< /Size %d /Root 1 0 R /Info 5 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
            len(objects) + 1,
            xref,
        )
        return bytes(out)


def invoice_pdf_filename(*, invoice: Invoice) -> str:
    name = invoice.number or invoice.stripe_id or f"invoice-{invoice.pk}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name) + ".pdf"


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def invoice_pdf(*, invoice: Invoice) -> bytes:
    statement = invoice_statement(invoice=invoice)
    currency = invoice.currency

    def money(amount_minor: int) -> str:
        return cents(amount_minor, currency)

    doc = _Document()
    doc.text(MARGIN, doc.y - 14, "Invoice", size=22, bold=True)
    doc.text(AMOUNT_RIGHT, doc.y - 10, "factory_saas", size=12, bold=True, right=True)
    doc.y -= 50
    period = f"{statement.first_day:%Y-%m-%d} to {statement.last_day:%Y-%m-%d}"
    facts = [
        ("Number", invoice.number or invoice.stripe_id or str(invoice.pk)),
        ("Issued", f"{invoice.issued_at:%Y-%m-%d}" if invoice.issued_at else "not yet"),
        ("Period", period),
        ("Status", invoice.get_status_display()),
        ("Billed to", _clip(invoice.organization.name, 60)),
        ("Currency", currency.upper()),
    ]
    for label, value in facts:
        doc.text(MARGIN, doc.y, label, bold=True)
        doc.text(MARGIN + 80, doc.y, value)
        doc.y -= LINE_HEIGHT
    doc.y -= LINE_HEIGHT

    def header() -> None:
        doc.text(MARGIN, doc.y, "Description", bold=True)
        doc.text(QUANTITY_RIGHT, doc.y, "Quantity", bold=True, right=True)
        doc.text(UNIT_LEFT, doc.y, "Unit", bold=True)
        doc.text(AMOUNT_RIGHT, doc.y, "Amount", bold=True, right=True)
        doc.rule(doc.y - 5)
        doc.y -= LINE_HEIGHT + 4

    header()
    for row in statement.charges:
        if doc.y - LINE_HEIGHT < BOTTOM:
            doc.new_page()
            header()
        doc.text(MARGIN, doc.y, _clip(row.description, DESCRIPTION_CHARS))
        doc.text(QUANTITY_RIGHT, doc.y, row.quantity, right=True)
        doc.text(UNIT_LEFT, doc.y, _clip(row.unit, 20))
        doc.text(AMOUNT_RIGHT, doc.y, money(row.amount_minor), right=True)
        doc.y -= LINE_HEIGHT
    if not statement.charges:
        doc.text(MARGIN, doc.y, "No charges.")
        doc.y -= LINE_HEIGHT

    totals = [("Subtotal", money(invoice.subtotal_minor))]
    if invoice.credits_minor:
        totals.append(("Credits applied", money(-invoice.credits_minor)))
    totals += [(row.description, money(row.amount_minor)) for row in statement.taxes]
    if invoice.tax_minor and not statement.taxes:
        totals.append(("Tax", money(invoice.tax_minor)))
    doc.ensure_room(LINE_HEIGHT * (len(totals) + 3))
    doc.rule(doc.y + LINE_HEIGHT - 5)
    doc.y -= 6
    for label, value in totals:
        doc.text(UNIT_LEFT, doc.y, label)
        doc.text(AMOUNT_RIGHT, doc.y, value, right=True)
        doc.y -= LINE_HEIGHT
    doc.rule(doc.y + LINE_HEIGHT - 5, x1=UNIT_LEFT)
    doc.y -= 6
    doc.text(UNIT_LEFT, doc.y, f"Total ({currency.upper()})", bold=True)
    doc.text(AMOUNT_RIGHT, doc.y, money(invoice.total_minor), bold=True, right=True)
    return doc.render(title=f"Invoice {facts[0][1]}")
