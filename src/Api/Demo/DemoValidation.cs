using System.Collections;
using System.ComponentModel.DataAnnotations;

namespace OrleansIdempotency.Api.Demo;

/// <summary>Text without control characters: a caller's ids and SKUs are printable, and PostgreSQL refuses NUL in text.</summary>
[AttributeUsage(AttributeTargets.Parameter | AttributeTargets.Property)]
public sealed class PrintableAttribute() : ValidationAttribute("The field {0} must hold no control characters.")
{
    public override bool IsValid(object? value) => value is not string text || !text.Any(char.IsControl);
}

/// <summary>An amount in whole cents: the store keeps two decimal places and would round the rest away.</summary>
[AttributeUsage(AttributeTargets.Parameter | AttributeTargets.Property)]
public sealed class CentsAttribute() : ValidationAttribute("The field {0} must have at most two decimal places.")
{
    public static bool IsCents(decimal amount) => decimal.Round(amount, 2) == amount;

    public override bool IsValid(object? value) => value is not decimal amount || IsCents(amount);
}

/// <summary>A list none of whose elements is null (a list's own validation looks only inside the elements there are).</summary>
[AttributeUsage(AttributeTargets.Parameter | AttributeTargets.Property)]
public sealed class NoNullElementsAttribute() : ValidationAttribute("The field {0} must not hold null.")
{
    public override bool IsValid(object? value) => value is not IEnumerable items || items.Cast<object?>().All(item => item is not null);
}
