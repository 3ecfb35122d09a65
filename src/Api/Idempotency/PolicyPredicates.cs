namespace OrleansIdempotency.AspNetCore;

/// <summary>
/// Asks a user's predicate whether a key is released (a policy's <c>ReleasesKey</c>, <c>ReleasesOnException</c>,
/// <c>IdempotencyOptions.OnceReleasesOnException</c>). One that throws says nothing: it counts as no, so the key is
/// kept (its response stored, or the key left in doubt), never released, since a release lets an action that took
/// effect run again; the throw is logged as an Error, and the caller still gets the action's own outcome.
/// </summary>
internal static partial class PolicyPredicates
{
    public static bool Releases<TState>(TState state, Func<TState, bool> ask, string predicate, ILogger logger)
    {
        try
        {
            return ask(state);
        }
        catch (Exception ex)
        {
            LogLines.TryWrite(logger, (predicate, ex), static (log, s) => LogThrew(log, s.predicate, s.ex));
            return false;
        }
    }

    [LoggerMessage(Level = LogLevel.Error, Message = "{Predicate} threw; the key is kept as if it had said no (the response stored, or the key left in doubt), never released.")]
    private static partial void LogThrew(ILogger logger, string predicate, Exception exception);
}
