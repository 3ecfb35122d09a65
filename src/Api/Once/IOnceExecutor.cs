namespace OrleansIdempotency.Once;

/// <summary>
/// The Once API in .NET (DESIGN §5), for work that is not an HTTP endpoint: a worker, an AI agent's tool call, a
/// webhook consumer. The action runs at most once per key; every later call gets its stored result.
/// </summary>
public interface IOnceExecutor
{
    /// <summary>
    /// Runs <paramref name="action"/> if <paramref name="key"/> has not run, stores its result (as JSON) and returns
    /// it; if the key has completed, returns the stored result without running anything; if it is running
    /// elsewhere, waits for it (the default policy's <c>WaitTimeout</c>). The first call gets the result as stored (its
    /// JSON read back as <typeparamref name="T"/>), as every later call does, so that all get the same value: what JSON
    /// drops (a member it ignores, a subtype's own members under <typeparamref name="T"/>) the first call does not see
    /// either, and a lazy sequence is enumerated once, to store it, while the claim is still renewed. Public fields are
    /// stored (a tuple's items). A result that cannot be stored as JSON that reads back (a cycle, or a getter or a lazy
    /// sequence's work that throws as it is written) is refused as <see cref="OnceRefusal.ResultNotStored"/> to this
    /// call as to later ones: the action ran, and is not run again.
    /// </summary>
    /// <remarks>
    /// An exception from the action gives the key back, so a later call runs it again, unless
    /// <paramref name="cancellationToken"/> was cancelled (whatever the action then throws: a cut-off gRPC or database
    /// call throws its own kind): an action cut off midway may have taken effect, so the key is left to lapse into an
    /// unknown outcome; cancelled before the action began, the key is given back and nothing runs. The action gets
    /// <paramref name="cancellationToken"/>.
    /// </remarks>
    /// <exception cref="OnceRefusedException">The key was used with another input, is still running after the wait,
    /// has an unknown outcome, or completed with a result too large to store.</exception>
    /// <exception cref="AspNetCore.IdempotencyUnavailableException">The store or the cluster did not answer: nothing ran.</exception>
    Task<T> ExecuteOnceAsync<T>(OnceKey key, Func<CancellationToken, Task<T>> action, CancellationToken cancellationToken = default);
}

/// <summary>A key of the Once API.</summary>
/// <param name="Key">The idempotency key: one per logical operation (a tool call's id, a webhook's delivery id).</param>
/// <param name="Scope">Whose keys these are (a tenant, a queue); keys of different scopes never meet.</param>
/// <param name="Input">
/// What the operation is asked to do (its arguments, say): the same key with another input is refused
/// (<see cref="OnceRefusal.KeyReused"/>) instead of replaying a result that belongs to other arguments.
/// </param>
public sealed record OnceKey(string Key, string Scope = "default", string Input = "")
{
    /// <summary>The key in the default scope, with no input to compare.</summary>
    public static implicit operator OnceKey(string key) => new(key);
}

/// <summary>Why the Once API did not run or replay a key.</summary>
public enum OnceRefusal
{
    /// <summary>The key was first used with another input; nothing ran.</summary>
    KeyReused,

    /// <summary>The key is still running elsewhere after the wait; ask again later.</summary>
    InProgress,

    /// <summary>An earlier run stopped without its outcome: it may or may not have taken effect. It is not run again.</summary>
    OutcomeUnknown,

    /// <summary>
    /// The key completed, but its result was not stored: larger than the layer stores, or not JSON that reads back as
    /// its type (the exception inside says why, to the call that ran it). It is not run again.
    /// </summary>
    ResultNotStored,
}

/// <summary>The Once API refused a key; <see cref="Reason"/> says why.</summary>
public sealed class OnceRefusedException(OnceRefusal reason, string key, string message, Exception? innerException = null)
    : Exception(message, innerException)
{
    /// <summary>Why.</summary>
    public OnceRefusal Reason { get; } = reason;

    /// <summary>The key refused.</summary>
    public string Key { get; } = key;
}
