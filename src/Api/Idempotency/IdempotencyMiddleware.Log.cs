namespace OrleansIdempotency.AspNetCore;

internal sealed partial class IdempotencyMiddleware
{
    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: the claim's lease ran out before the response could be stored; later requests get outcome-unknown.")]
    private static partial void LogCompletionRefused(ILogger logger, string key);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: left in doubt ({Reason}). The action may have taken effect, so its claim is left to lapse into outcome-unknown, for an operator to settle.")]
    private static partial void LogLeftInDoubt(ILogger logger, string key, string reason);

    [LoggerMessage(Level = LogLevel.Warning, Message = "Idempotency key {Key}: the response the action completed before it failed could not be sent ({Reason}).")]
    private static partial void LogCompletedResponseUnsent(ILogger logger, string key, string reason);

    [LoggerMessage(Level = LogLevel.Warning, Message = "A caller authenticated by {AuthenticationType} has no scope (by default its NameIdentifier or sub claim): refused with 403, since it would otherwise share keys with every such caller. Set the policy's Scope to a claim it carries.")]
    private static partial void LogUnscopedCaller(ILogger logger, string? authenticationType);
}
