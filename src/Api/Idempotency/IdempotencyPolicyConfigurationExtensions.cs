using System.Globalization;
using OrleansIdempotency.Grains;

namespace OrleansIdempotency.AspNetCore;

/// <summary>Reads a policy's settings from configuration, so operators can tune them without a rebuild.</summary>
public static class IdempotencyPolicyConfigurationExtensions
{
    /// <summary>
    /// The policy with the values present in <paramref name="section"/> applied: <c>Retention</c>, <c>Lease</c> and
    /// <c>WaitTimeout</c> (TimeSpan, for example <c>00:00:30</c>), <c>ConcurrentDuplicates</c> (<c>Wait</c> or
    /// <c>Reject</c>), <c>OnLapsedLease</c> (<c>OutcomeUnknown</c> or <c>Reclaim</c>), <c>MaxStoredResponseBytes</c>,
    /// <c>MaxRequestBodyBytes</c>, <c>KeyRequired</c> and <c>AllowAnonymous</c>. Absent values keep the policy's own.
    /// </summary>
    public static IdempotencyPolicy Configure(this IdempotencyPolicy policy, IConfiguration section)
    {
        ArgumentNullException.ThrowIfNull(section);
        return (policy with
        {
            Retention = Read(section, nameof(IdempotencyPolicy.Retention), policy.Retention, Duration),
            Lease = Read(section, nameof(IdempotencyPolicy.Lease), policy.Lease, Duration),
            WaitTimeout = Read(section, nameof(IdempotencyPolicy.WaitTimeout), policy.WaitTimeout, Duration),
            ConcurrentDuplicates = Read(section, nameof(IdempotencyPolicy.ConcurrentDuplicates), policy.ConcurrentDuplicates, EnumName<ConcurrentDuplicateHandling>),
            OnLapsedLease = Read(section, nameof(IdempotencyPolicy.OnLapsedLease), policy.OnLapsedLease, EnumName<LapsedLeasePolicy>),
            MaxStoredResponseBytes = Read(section, nameof(IdempotencyPolicy.MaxStoredResponseBytes), policy.MaxStoredResponseBytes, v => int.Parse(v, CultureInfo.InvariantCulture)),
            MaxRequestBodyBytes = Read(section, nameof(IdempotencyPolicy.MaxRequestBodyBytes), policy.MaxRequestBodyBytes, v => long.Parse(v, CultureInfo.InvariantCulture)),
            KeyRequired = Read(section, nameof(IdempotencyPolicy.KeyRequired), policy.KeyRequired, bool.Parse),
            AllowAnonymous = Read(section, nameof(IdempotencyPolicy.AllowAnonymous), policy.AllowAnonymous, bool.Parse),
        }).Validate();
    }

    private static T Read<T>(IConfiguration section, string name, T current, Func<string, T> parse)
    {
        var value = section[name];
        if (string.IsNullOrWhiteSpace(value))
        {
            return current;
        }

        try
        {
            return parse(value);
        }
        catch (Exception ex) when (ex is FormatException or OverflowException)
        {
            throw new InvalidOperationException($"Idempotency setting {name} = '{value}' is not valid: {ex.Message}", ex);
        }
    }

    // hh:mm:ss, with days before them if need be: TimeSpan alone reads a bare number as days ("10" as ten days).
    private static TimeSpan Duration(string value) => value.Contains(':', StringComparison.Ordinal)
        ? TimeSpan.Parse(value, CultureInfo.InvariantCulture)
        : throw new FormatException("A duration is hh:mm:ss (00:00:30 for 30 seconds), or d.hh:mm:ss.");

    // One of the enum's names, in any case: not a number, nor a list of names, which Enum.Parse would take as well.
    private static T EnumName<T>(string value)
        where T : struct, Enum =>
        Enum.GetNames<T>().FirstOrDefault(name => name.Equals(value.Trim(), StringComparison.OrdinalIgnoreCase)) is { } name
            ? Enum.Parse<T>(name)
            : throw new FormatException($"Expected one of: {string.Join(", ", Enum.GetNames<T>())}.");
}
