namespace OrleansIdempotency.AspNetCore;

/// <summary>Options for the idempotency layer: the default policy, named policies, and where errors are documented.</summary>
public sealed class IdempotencyOptions
{
    private readonly Dictionary<string, IdempotencyPolicy> policies = new(StringComparer.Ordinal);

    /// <summary>The policy of endpoints that name none. The default is <see cref="IdempotencyPolicy.Default"/>.</summary>
    public IdempotencyPolicy DefaultPolicy { get; set; } = IdempotencyPolicy.Default;

    /// <summary>
    /// Prefix of the problem <c>type</c> URIs (RFC 9457); each error appends its name, for example
    /// <c>key-missing</c>. The default is <c>https://orleans-idempotency.dev/problems/</c>; the types are described in
    /// <c>docs/problems.md</c>.
    /// </summary>
    public Uri ProblemTypeBase { get; set; } = new("https://orleans-idempotency.dev/problems/");

    /// <summary>
    /// How long the layer keeps asking the cluster when a call is lost (a silo died, a message timed out) before it
    /// answers 503. The default is 15 seconds.
    /// </summary>
    public TimeSpan ClusterRetryBudget { get; set; } = TimeSpan.FromSeconds(15);

    /// <summary>
    /// How many bytes of completed responses each process keeps to replay them without asking the cluster (a
    /// completed record is final until its retention ends). The default is 32 MiB; 0 turns it off.
    /// </summary>
    public long ReplayCacheBytes { get; set; } = 32L * 1024 * 1024;

    /// <summary>
    /// Whether an exception from an <c>ExecuteOnceAsync</c> action, its caller not having cancelled, releases the key
    /// so the next call runs the action. The default releases, for every exception. Answer false for the exceptions
    /// after which the action may have taken effect (a downstream time-out, say: <c>ex is TimeoutException or
    /// TaskCanceledException</c>): the key is left to lapse into an unknown outcome instead of running twice. An
    /// exception once the caller cancelled always leaves the key in doubt.
    /// </summary>
    public Func<Exception, bool> OnceReleasesOnException { get; set; } = static _ => true;

    /// <summary>Adds a named policy, for endpoints that say <c>[Idempotent(PolicyName = name)]</c> or <c>.RequireIdempotency(name)</c>.</summary>
    public IdempotencyOptions AddPolicy(string name, IdempotencyPolicy policy)
    {
        ArgumentException.ThrowIfNullOrEmpty(name);
        policies[name] = policy.Validate();
        return this;
    }

    /// <summary>Adds a named policy derived from <see cref="DefaultPolicy"/>.</summary>
    public IdempotencyOptions AddPolicy(string name, Func<IdempotencyPolicy, IdempotencyPolicy> configure) =>
        AddPolicy(name, configure(DefaultPolicy));

    /// <summary>Resolves <paramref name="metadata"/> to check it, naming <paramref name="owner"/> (an endpoint, a route) if it is not valid.</summary>
    internal void Check(IIdempotencyMetadata metadata, string owner)
    {
        try
        {
            Resolve(metadata);
        }
        catch (Exception e) when (e is InvalidOperationException or ArgumentException)
        {
            throw new InvalidOperationException($"The idempotency policy of {owner} is not valid: {e.Message}", e);
        }
    }

    internal IdempotencyPolicy Resolve(IIdempotencyMetadata metadata)
    {
        var policy = DefaultPolicy;
        if (metadata.PolicyName is { } name && !policies.TryGetValue(name, out policy))
        {
            throw new InvalidOperationException($"No idempotency policy named '{name}'. Add it with IdempotencyOptions.AddPolicy.");
        }

        return (metadata.Configure?.Invoke(policy) ?? policy).Validate();
    }
}
